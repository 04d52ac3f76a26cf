"""Data collection and cleaning behind data_process/fetch_dataset.py and data_process/process_data.py."""

"""data_process"""

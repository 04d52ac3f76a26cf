"""self_model/fine_tuning"""

"""self_model/rlhf"""

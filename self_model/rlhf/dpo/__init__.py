"""self_model/rlhf/dpo"""

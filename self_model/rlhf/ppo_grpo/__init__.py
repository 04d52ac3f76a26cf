"""self_model/rlhf/ppo_grpo"""

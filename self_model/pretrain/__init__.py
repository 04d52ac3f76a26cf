"""self_model/pretrain"""

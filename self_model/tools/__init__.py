"""self_model/tools"""

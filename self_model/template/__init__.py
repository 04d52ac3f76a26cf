"""self_model/template"""

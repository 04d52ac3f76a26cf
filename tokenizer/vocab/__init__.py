"""tokenizer/vocab"""

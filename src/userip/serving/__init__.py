"""userip.serving"""

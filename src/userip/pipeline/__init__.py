"""userip.pipeline"""

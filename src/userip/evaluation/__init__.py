"""userip.evaluation"""

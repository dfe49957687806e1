"""userip.feature_bank"""

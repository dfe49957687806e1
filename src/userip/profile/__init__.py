"""userip.profile"""

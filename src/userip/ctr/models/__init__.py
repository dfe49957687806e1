"""userip.ctr.models"""

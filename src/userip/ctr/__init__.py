"""userip.ctr"""

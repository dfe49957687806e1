"""userip.codebook"""

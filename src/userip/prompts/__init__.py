"""userip.prompts"""

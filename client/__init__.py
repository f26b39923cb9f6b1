"""fedcybgd.client"""

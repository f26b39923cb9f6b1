"""fedcybgd.cli"""

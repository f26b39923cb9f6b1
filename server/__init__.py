"""fedcybgd.server"""

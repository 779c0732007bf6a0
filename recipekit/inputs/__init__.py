"""The inputs layer: models, adapters and side files a recipe names, resolved and read safely.

``resolve_sources`` (inputs/resolve.py) is its entry point; ``files`` holds the confinement,
bounded reads and content hash every read of an input goes through.
"""

"""The contract shared with ``export/``.

Records and headers, the manifest, preprocessing, the reference task, errors.
"""

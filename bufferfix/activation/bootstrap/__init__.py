"""Not imported: this directory is what ``bufferfix-run`` puts first on PYTHONPATH.

Its ``sitecustomize.py`` arms bufferfix's start-up activation in every Python process
started under ``bufferfix-run`` (see ``bufferfix/activation/launcher.py``).
"""

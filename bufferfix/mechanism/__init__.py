"""The mechanism: snapshot real values, record constructors, restore after materialisation.

Everything here needs torch; it is imported only once torch itself is imported.
"""

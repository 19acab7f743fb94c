"""Requirement lines read from setup.cfg, for .ci/run (standard library only).

    python3 .ci/requirements.py floors            every ">=" floor of install_requires and of the
                                                  transformers and test extras, as "name==floor"
    python3 .ci/requirements.py extra NAME [-PKG]  the extra's requirements, without the packages named -PKG
"""
import configparser
import os
import re
import sys

SETUP_CFG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "setup.cfg")
FLOOR_SECTIONS = (("options", "install_requires"), ("options.extras_require", "transformers"),
                  ("options.extras_require", "test"))


def requirements(section, key):
    config = configparser.ConfigParser()
    config.read(SETUP_CFG)
    lines = (line.split("#")[0].strip() for line in config[section][key].splitlines())
    return [line for line in lines if line]


def name(requirement):
    return re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower().replace("_", "-")


def floors():
    found = {}
    for section, key in FLOOR_SECTIONS:
        for requirement in requirements(section, key):
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", requirement)
            if match:
                found.setdefault(name(match.group(1)), match.group(2))
    return ["%s==%s" % item for item in found.items()]


def main(argv):
    if argv[:1] == ["floors"]:
        lines = floors()
    elif argv[:1] == ["extra"] and len(argv) >= 2:
        left_out = {name(argument[1:]) for argument in argv[2:] if argument.startswith("-")}
        lines = [r for r in requirements("options.extras_require", argv[1]) if name(r) not in left_out]
    else:
        sys.exit(__doc__)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])

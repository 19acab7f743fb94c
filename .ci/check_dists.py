"""Checks on the wheel and the sdist that `python -m build` left in DIST (run by .ci/run).

    python .ci/check_dists.py DIST

- both carry LICENSE; the wheel carries py.typed, the demo's config and the start-up hook;
- the sdist carries every tracked file under tests/ and benchmarks/, and its tests collect (with
  this interpreter's packages) in the unpacked sdist without an error.
"""
import glob
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def check(condition, message):
    if not condition:
        sys.exit("check_dists: " + message)


def main(dist):
    [wheel] = glob.glob(os.path.join(dist, "*.whl"))
    [sdist] = glob.glob(os.path.join(dist, "*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("bufferfix/py.typed", "bufferfix/tools/data/demo_qwen2.json", "bufferfix-startup.pth",
                   "_bufferfix_startup/__init__.py"):
        check(needed in names, "%s lacks %s" % (wheel, needed))
    check(any(name.endswith(".dist-info/licenses/LICENSE") for name in names), "%s lacks LICENSE" % wheel)
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
        top = members[0].split("/")[0]
        tracked = subprocess.run(["git", "ls-files", "tests", "benchmarks", "LICENSE"], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout.split()
        missing = [path for path in tracked if "%s/%s" % (top, path) not in members]
        check(not missing, "%s lacks %s" % (sdist, ", ".join(missing)))
        with tempfile.TemporaryDirectory() as directory:
            archive.extractall(directory, filter="data")
            collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                        "-m", "not slow"], cwd=os.path.join(directory, top), capture_output=True,
                                       text=True)
    check(collected.returncode == 0, "the unpacked sdist's tests do not collect:\n" + collected.stdout[-3000:])
    print("check_dists: %s and %s: LICENSE in both; the sdist's tests collect (%s)"
          % (os.path.basename(wheel), os.path.basename(sdist), collected.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main(sys.argv[1])

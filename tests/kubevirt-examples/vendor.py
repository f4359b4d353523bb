#!/usr/bin/env python3
"""Re-vendors the KubeVirt examples regdisk's tests validate.

    tests/kubevirt-examples/vendor.py KUBEVIRT.git USER-GUIDE.git

KUBEVIRT.git and USER-GUIDE.git are git directories of kubevirt/kubevirt and
kubevirt/user-guide. Takes every VirtualMachine, VirtualMachineInstance and
VirtualMachineInstanceReplicaSet (kubevirt.io/v1) from kubevirt's examples/
and from the YAML blocks of the user guide's docs/ whose volumes are all
containerDisk, cloudInitNoCloud or emptyDisk, and writes them verbatim to
kubevirt/ and user-guide/ here, with SOURCES (where each came from).
"""
import os
import re
import subprocess
import sys

import yaml

KINDS = {"VirtualMachine", "VirtualMachineInstance", "VirtualMachineInstanceReplicaSet"}
SOURCES = {"containerDisk", "cloudInitNoCloud", "emptyDisk"}
HERE = os.path.dirname(os.path.abspath(__file__))


def git(gitdir, *args):
    return subprocess.run(["git", "--git-dir", gitdir, *args], check=True, capture_output=True, text=True).stdout


def usable(text):
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError:
        return False
    if not docs:
        return False
    for d in docs:
        if not isinstance(d, dict) or d.get("apiVersion") != "kubevirt.io/v1" or d.get("kind") not in KINDS:
            return False
        spec = d.get("spec") or {}
        if not isinstance(spec, dict) or "dataVolumeTemplates" in spec:
            return False
        inner = spec if d["kind"] == "VirtualMachineInstance" else (spec.get("template") or {}).get("spec") or {}
        volumes = inner.get("volumes") if isinstance(inner, dict) else None
        if not volumes or not isinstance(volumes, list):
            return False
        for v in volumes:
            if not isinstance(v, dict) or not set(v) - {"name"} or not set(v) - {"name"} <= SOURCES:
                return False
    return True


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: vendor.py KUBEVIRT.git USER-GUIDE.git")
    kv, ug = sys.argv[1:]
    lines = []
    for name, gitdir in (("kubevirt/kubevirt", kv), ("kubevirt/user-guide", ug)):
        commit = git(gitdir, "rev-parse", "HEAD").strip()
        lines.append("# %s at %s" % (name, commit))
    out_kv = os.path.join(HERE, "kubevirt")
    out_ug = os.path.join(HERE, "user-guide")
    for d in (out_kv, out_ug):
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
    for path in git(kv, "ls-tree", "--name-only", "HEAD", "examples/").split():
        if not path.endswith(".yaml"):
            continue
        text = git(kv, "show", "HEAD:" + path)
        if usable(text):
            with open(os.path.join(out_kv, os.path.basename(path)), "w", encoding="utf-8") as f:
                f.write(text)
            lines.append("kubevirt/%s\tkubevirt/kubevirt %s" % (os.path.basename(path), path))
    for path in git(ug, "ls-tree", "-r", "--name-only", "HEAD", "docs/").split():
        if not path.endswith(".md"):
            continue
        text = git(ug, "show", "HEAD:" + path)
        for i, m in enumerate(re.finditer(r"```ya?ml\n(.*?)```", text, re.S)):
            if not usable(m.group(1)):
                continue
            name = path[len("docs/"):-len(".md")].replace("/", "-") + "-%d.yaml" % i
            with open(os.path.join(out_ug, name), "w", encoding="utf-8") as f:
                f.write(m.group(1))
            lines.append("user-guide/%s\tkubevirt/user-guide %s, YAML block %d" % (name, path, i))
    with open(os.path.join(HERE, "SOURCES"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

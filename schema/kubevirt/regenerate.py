#!/usr/bin/env python3
"""Regenerates schema/kubevirt/swagger-subset.json from KubeVirt's published
OpenAPI document (api/openapi-spec/swagger.json in kubevirt/kubevirt).

    git --git-dir=KUBEVIRT.git show COMMIT:api/openapi-spec/swagger.json > swagger.json
    schema/kubevirt/regenerate.py swagger.json COMMIT VERSION > schema/kubevirt/swagger-subset.json

Keeps the definitions reachable from the kinds regdisk reads (v1.VirtualMachine,
v1.VirtualMachineInstance, v1.VirtualMachineInstanceReplicaSet), without their
descriptions; nothing else is changed.
"""
import json
import sys

ROOTS = ["v1.VirtualMachine", "v1.VirtualMachineInstance", "v1.VirtualMachineInstanceReplicaSet"]


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: regenerate.py SWAGGER.json COMMIT VERSION")
    with open(sys.argv[1], encoding="utf-8") as f:
        definitions = json.load(f)["definitions"]
    seen = set()

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                name = ref.rsplit("/", 1)[-1]
                if name not in seen:
                    seen.add(name)
                    walk(definitions[name])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for root in ROOTS:
        seen.add(root)
        walk(definitions[root])

    def strip(node, in_properties=False):
        if isinstance(node, dict):
            return {k: strip(v, k == "properties" and not in_properties) for k, v in node.items()
                    if in_properties or k != "description"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    out = {
        "source": "https://github.com/kubevirt/kubevirt/blob/%s/api/openapi-spec/swagger.json" % sys.argv[2],
        "commit": sys.argv[2],
        "version": sys.argv[3],
        "roots": ROOTS,
        "definitions": {name: strip(definitions[name]) for name in sorted(seen)},
    }
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Checks our protos against a checkout of envoyproxy/data-plane-api.

Usage: protos/check_upstream.py PATH_TO_DATA_PLANE_API

For every message and enum we define, the upstream definition with the same full name must have
each of our fields with the same number, the same type (compared by its last name component),
the same label (repeated/map) and the same oneof membership, and each of our enum values with the
same number. Fields we leave out are fine (decoders skip them). Exit status 1 on any mismatch.
"""
import pathlib
import re
import sys

TOKEN = re.compile(
    r"(?P<open>(?:message|enum|oneof|service)\s+(?P<name>\w+)\s*\{)"
    r"|(?P<close>\})"
    r"|(?P<field>(?P<label>repeated\s+|optional\s+)?(?P<type>map\s*<[^>]+>|[\w.]+)\s+(?P<fname>\w+)\s*=\s*(?P<num>\d+)\s*;)"
    r"|(?P<value>(?P<vname>\w+)\s*=\s*(?P<vnum>-?\d+)\s*;)"
)


def strip(source):
    # String literals first: option values may hold brackets and braces (regex patterns).
    source = re.sub(r'"(?:[^"\\\n]|\\.)*"', '""', source)
    source = re.sub(r"//[^\n]*", "", source)
    source = re.sub(r"/\*.*?\*/", "", source, flags=re.S)
    source = re.sub(r"\[[^\]]*\]", "", source, flags=re.S)  # field options
    source = re.sub(r"\boption\s[^;]*;", "", source)
    source = re.sub(r"\breserved\s[^;]*;", "", source)
    source = re.sub(r"\brpc\s[^;{]*(\{[^}]*\}|;)", "", source)
    return source


def definitions(path):
    """Returns {full name: ('message'|'enum', {member: (number, type, label, oneof)})}."""
    source = path.read_text()
    package = re.search(r"^\s*package\s+([\w.]+)\s*;", source, re.M).group(1)
    out = {}
    stack = []  # (kind, name)
    for match in TOKEN.finditer(strip(source)):
        if match.group("open"):
            kind = match.group(0).split()[0]
            stack.append((kind, match.group("name")))
            if kind in ("message", "enum"):
                names = [name for k, name in stack if k in ("message", "enum")]
                out[package + "." + ".".join(names)] = (kind, {})
        elif match.group("close"):
            if stack:
                stack.pop()
        else:
            scopes = [name for k, name in stack if k in ("message", "enum")]
            if not scopes:
                continue
            owner = out[package + "." + ".".join(scopes)]
            oneof = stack[-1][1] if stack and stack[-1][0] == "oneof" else None
            if match.group("field") and owner[0] == "message":
                type_ = re.sub(r"\s+", "", match.group("type"))
                label = (match.group("label") or "").strip()
                if type_.startswith("map<"):
                    key, value = type_[4:-1].split(",")
                    type_ = "map<%s,%s>" % (key, value.split(".")[-1])
                else:
                    type_ = type_.split(".")[-1]
                owner[1][match.group("fname")] = (int(match.group("num")), type_, label, oneof)
            elif match.group("value") and owner[0] == "enum":
                owner[1][match.group("vname")] = (int(match.group("vnum")), None, "", None)
    return out


def load(root):
    result = {}
    for path in sorted(pathlib.Path(root).rglob("*.proto")):
        try:
            result.update(definitions(path))
        except AttributeError:
            continue  # a file without a package (not part of the API)
    return result


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    ours = load(pathlib.Path(__file__).resolve().parent)
    upstream = load(sys.argv[1])
    problems = []
    checked = 0
    for name, (kind, members) in sorted(ours.items()):
        if name.startswith("google."):
            continue  # google.rpc.Status is checked by hand: {code=1, message=2, details=3}
        if name.startswith("remora."):
            continue  # our own messages (protos/remora/): no upstream to check against
        if name.startswith("xds.") and not members:
            continue  # cncf/xds, not in data-plane-api; declared without fields, nothing to check
        if name not in upstream:
            problems.append(f"{name}: not found upstream")
            continue
        up_kind, up_members = upstream[name]
        if up_kind != kind:
            problems.append(f"{name}: {kind} here, {up_kind} upstream")
        for member, facts in members.items():
            checked += 1
            if member not in up_members:
                problems.append(f"{name}.{member}: not found upstream")
            elif up_members[member] != facts:
                problems.append(f"{name}.{member}: ours {facts}, upstream {up_members[member]}")
    for problem in problems:
        print(problem)
    print(
        f"checked {checked} fields and enum values in {len(ours)} definitions: {len(problems)} problems"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

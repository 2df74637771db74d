"""Validates JSON documents against a schema of docs/ with the `jsonschema` library (PyPI),
for the tests: one document per line on standard input.

    python scripts/check-json.py docs/usage.schema.json < documents

Prints `ok N` and exits 0 when every document is valid; else prints each error and exits 1.
"""

import json
import pathlib
import sys

import jsonschema

schema = json.loads(pathlib.Path(sys.argv[1]).read_text())
jsonschema.Draft202012Validator.check_schema(schema)
validator = jsonschema.Draft202012Validator(schema)
n = 0
bad = 0
for line in sys.stdin:
    if not line.strip():
        continue
    n += 1
    for error in validator.iter_errors(json.loads(line)):
        bad += 1
        print(f"document {n}: {'/'.join(map(str, error.absolute_path))}: {error.message}")
if bad:
    sys.exit(1)
print(f"ok {n}")

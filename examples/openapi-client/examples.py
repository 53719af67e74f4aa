"""Every example of the OpenAPI document validates against the schema it illustrates: a
generator copies them into docstrings and documentation, and schemathesis sends the request
examples to the server (make fuzz), so a wrong one misleads both. OpenAPI 3.0 schemas are
checked as JSON Schema (draft 4, what 3.0 builds on) with the document's components resolvable.

Usage: python examples.py src/api/openapi.json
"""

import json
import sys

import jsonschema

document = json.load(open(sys.argv[1]))
checked, problems = 0, []


def deref(node):
    """A response, parameter or request body given as a $ref: the object it names."""
    while isinstance(node, dict) and "$ref" in node:
        target = document
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def check(schema, value, where):
    global checked
    # The document as the root, so that the schema's "#/components/..." references resolve.
    root = dict(document, **{"$ref": "#/__schema"}, __schema=schema)
    try:
        jsonschema.Draft4Validator(root).validate(value)
        checked += 1
    except jsonschema.ValidationError as error:
        problems.append(f"{where}: {error.message}")


def media(content, where):
    for media_type, item in (content or {}).items():
        schema = item.get("schema")
        if schema is None:
            continue
        if "example" in item:
            check(schema, item["example"], f"{where} {media_type} example")
        for name, example in item.get("examples", {}).items():
            check(schema, deref(example)["value"], f"{where} {media_type} examples.{name}")


for path, operations in document["paths"].items():
    for method, operation in operations.items():
        where = f"{method.upper()} {path}"
        for parameter in map(deref, operation.get("parameters", [])):
            if "example" in parameter:
                check(parameter["schema"], parameter["example"], f"{where} parameter {parameter['name']}")
        media(deref(operation.get("requestBody", {})).get("content"), f"{where} request")
        for status, response in operation["responses"].items():
            media(deref(response).get("content"), f"{where} {status}")
for name, schema in document["components"]["schemas"].items():
    if "example" in schema:
        check(schema, schema["example"], f"components.schemas.{name} example")

for problem in problems:
    print(f"openapi examples: {problem}", file=sys.stderr)
print(f"openapi examples: {checked} checked, {len(problems)} wrong")
sys.exit(1 if problems or checked == 0 else 0)

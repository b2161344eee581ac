"""The other side of tests/signing.rs's interoperability test, written with
the PyPI package http-message-signatures (3.x): it derives VM keys from the
master keys on its own (HMAC-SHA256 over b"guest-agent vm key v1", 0x00,
the VM id), verifies requests the agent made, and signs requests for the
ingest kit to accept.

    python pyhms.py verify MASTER_FILE < requests.jsonl
        one JSON request a line ({"method", "url", "headers": [[name, value]],
        "body_b64"}); prints "ok KEYID" or "refused REASON" per line
    python pyhms.py sign VM_KEY_LINE VM_ID URL BODY_FILE
        prints the headers to send, as a JSON object
"""

import base64
import hashlib
import hmac
import json
import sys

import http_message_signatures as hms
from http_message_signatures import algorithms

COMPONENTS = ("@method", "@path", "content-digest")


class Message:
    def __init__(self, method, url, headers):
        self.method = method
        self.url = url
        self.headers = headers


class Headers(dict):
    """Field names as sent; lookups by any case, as HTTP has them."""

    def _key(self, name):
        for k in dict.keys(self):
            if k.lower() == name.lower():
                return k
        return name

    def __contains__(self, name):
        return any(k.lower() == name.lower() for k in dict.keys(self))

    def __getitem__(self, name):
        return dict.__getitem__(self, self._key(name))

    def __setitem__(self, name, value):
        dict.__setitem__(self, self._key(name), value)

    def __delitem__(self, name):
        dict.__delitem__(self, self._key(name))


class VmKeys(hms.HTTPSignatureKeyResolver):
    """keyid KID/VM_ID -> HMAC-SHA256(master[KID], context 0x00 VM_ID)."""

    def __init__(self, masters):
        self.masters = masters

    def resolve_public_key(self, key_id):
        kid, _, vm_id = key_id.partition("/")
        master = self.masters.get(kid)
        if master is None or not vm_id:
            return None
        msg = b"guest-agent vm key v1\x00" + vm_id.encode()
        return hmac.new(master, msg, hashlib.sha256).digest()


def masters(path):
    keys = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                kid, hexkey = line.split()
                keys[kid] = bytes.fromhex(hexkey)
    return keys


def verify(master_file):
    verifier = hms.HTTPMessageVerifier(
        signature_algorithm=algorithms.HMAC_SHA256,
        key_resolver=VmKeys(masters(master_file)),
    )
    for line in sys.stdin:
        req = json.loads(line)
        headers = Headers()
        for name, value in req["headers"]:
            if name in headers:
                headers[name] = headers[name] + ", " + value
            else:
                headers[name] = value
        body = base64.b64decode(req["body_b64"])
        try:
            results = verifier.verify(
                Message(req["method"], req["url"], headers),
                max_age=None,
                require_components=COMPONENTS,
                body=body,
            )
            print("ok", results[0].parameters["keyid"], flush=True)
        except Exception as e:  # the reason is the test's output
            print("refused", repr(e), flush=True)


def sign(vm_key_line, vm_id, url, body_file):
    kid, hexkey = vm_key_line.split()
    with open(body_file, "rb") as f:
        body = f.read()
    key_id = kid + "/" + vm_id
    signer = hms.HTTPMessageSigner(
        signature_algorithm=algorithms.HMAC_SHA256,
        key_resolver=hms.MappingKeyResolver(
            public_keys={}, private_keys={key_id: bytes.fromhex(hexkey)}
        ),
    )
    headers = Headers({"Content-Type": "application/json"})
    message = Message("POST", url, headers)
    signer.sign(
        message,
        key_id=key_id,
        label="ga",
        covered_component_ids=COMPONENTS,
        body=body,
    )
    print(json.dumps(dict(headers)))


if __name__ == "__main__":
    if sys.argv[1] == "verify":
        verify(sys.argv[2])
    else:
        sign(*sys.argv[2:6])

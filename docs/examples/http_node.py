"""A node in twenty lines: each job's audio goes to an HTTP model server, its answer comes back.

    python docs/examples/http_node.py --url ws://127.0.0.1:8765    (--help for the rest)
"""
import base64
import json
import os
import urllib.request

from scheduler.node import Job, Result, run_node

MODEL_URL = os.environ.get("MODEL_URL", "http://127.0.0.1:9000/translate")


def translate(job: Job) -> Result:
    """Send the job's audio to $MODEL_URL; answer with the transcript and translation it returns."""
    body = json.dumps({"audio": base64.b64encode(job.audio).decode(), "sample_rate": job.sample_rate,
                       "src": job.src_lang, "tgt": job.tgt_lang}).encode()
    request = urllib.request.Request(MODEL_URL, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=job.seconds_left) as reply:
        answer = json.load(reply)
    return Result(source_text=answer["transcript"], text=answer["translation"])


if __name__ == "__main__":
    raise SystemExit(run_node(translate, lang_pairs=[("en", "es")], max_jobs=2))

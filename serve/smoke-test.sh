#!/usr/bin/env bash
# Serve a conqur checkpoint with `conqur serve` and check it over HTTP: a completion, a chat completion, a
# streamed completion, the conqur info metric, then a bounded load test (throughput, TTFT, TPOT).
#   bash serve/smoke-test.sh CHECKPOINT [extra vLLM flags...]
# Needs vLLM and this package importable by python3. Logs go to $OUT (default /tmp). Exits non-zero on any
# failed check, printing the end of the server log.
set -euo pipefail
ckpt=$1; shift
out=${OUT:-/tmp}
port=${PORT:-8000}
url=http://127.0.0.1:$port
python3 -m conqur_vllm.cli serve "$ckpt" --port "$port" --enforce-eager --max-model-len 2048 "$@" \
  >"$out/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
fail() { echo "FAIL: $*"; tail -40 "$out/server.log"; exit 1; }
for _ in $(seq 1 240); do
  curl -sf "$url/health" >/dev/null && break
  kill -0 $pid 2>/dev/null || fail "the server exited"
  sleep 2
done
curl -sf "$url/health" >/dev/null || fail "no /health after 480 s"
post() { curl -sf "$url/v1/$1" -H 'Content-Type: application/json' -d "$2"; }
echo "completion: $(post completions "{\"model\":\"$ckpt\",\"prompt\":\"The capital of France is\",\"max_tokens\":16,\"temperature\":0}" |
  python3 -c 'import json,sys; print(repr(json.load(sys.stdin)["choices"][0]["text"]))')" || fail "completion"
echo "chat: $(post chat/completions "{\"model\":\"$ckpt\",\"messages\":[{\"role\":\"user\",\"content\":\"What is 2 + 2?\"}],\"max_tokens\":24,\"temperature\":0}" |
  python3 -c 'import json,sys; print(repr(json.load(sys.stdin)["choices"][0]["message"]["content"]))')" || fail "chat"
chunks=$(post completions "{\"model\":\"$ckpt\",\"prompt\":\"Once upon a time\",\"max_tokens\":16,\"stream\":true}" | grep -c '^data: {')
[ "$chunks" -ge 2 ] || fail "streaming gave $chunks chunks"
echo "stream: $chunks chunks"
curl -sf "$url/metrics" | grep -E '^conqur_checkpoint_info' || fail "no conqur_checkpoint_info metric"
grep -h -o 'conqur: .*' "$out/server.log" | sort -u | head -5 || true
python3 -m conqur_vllm.loadtest --url "$url" --model "$ckpt" --prompts 64 --max-tokens 128 --concurrency 32 \
  | tee "$out/loadtest.json"
echo "smoke test passed"

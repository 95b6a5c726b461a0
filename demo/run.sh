#!/usr/bin/env bash
# `make demo`: build two real fine-tunes offline (cached), publish them to a local Hub server, merge them from
# there with hubmerge, push the merge, then show the card and evaluate the merge on both domains.
set -euo pipefail
cd "$(dirname "$0")/.."

python demo/build_models.py --link .demo

hub_root=$(mktemp -d -t hubmerge-demo-hub.XXXXXX)
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
token="hubmerge-demo-$(python -c 'import secrets; print(secrets.token_hex(8))')"
hubmerge hub serve --root "$hub_root/storage" --port "$port" --token "$token=demo" >"$hub_root/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -rf "$hub_root"' EXIT
export HF_ENDPOINT="http://127.0.0.1:$port" HF_TOKEN="$token" HF_HUB_DISABLE_XET=1 HF_HOME="$hub_root/hf-home"
export HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_PROGRESS_BARS=1
for _ in $(seq 100); do
  python -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2).close()" 2>/dev/null && break
  sleep 0.1
done

echo "== local Hub at $HF_ENDPOINT: publishing the two fine-tunes"
python demo/publish.py .demo/minilm-sentiment-tweets demo/minilm-sentiment-tweets \
                       .demo/minilm-sentiment-movies demo/minilm-sentiment-movies

echo; echo "== hubmerge plan recipes/demo.yaml (headers only)"
hubmerge plan recipes/demo.yaml | tail -n 12

echo; echo "== hubmerge recipes/demo.yaml --force (stream from the Hub, merge, push)"
hubmerge recipes/demo.yaml --force

echo; echo "== the model card (out/demo-merge/README.md)"
cat out/demo-merge/README.md

echo; echo "== held-out Pearson correlation with human ratings"
python demo/evaluate.py .demo/minilm-sentiment-tweets .demo/minilm-sentiment-movies out/demo-merge --eval .demo/eval

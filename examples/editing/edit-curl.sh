#!/usr/bin/env bash
# Edits an image with curl through sd35-server's editing routes:
#   1. the OpenAI edit (multipart/form-data): with MASK, a PNG of the image's size that is
#      fully transparent where to repaint, it inpaints; without, it edits the whole image;
#   2. /v1/img2img (JSON, the image in base64), answered with the image's bytes — here JPEG,
#      chosen by the Accept header.
#
#   examples/editing/edit-curl.sh IMAGE [MASK]
#
# SD35_URL is the server (default http://localhost:8080, e.g. after
# `kubectl port-forward svc/sd35-turbo 8080:8080`); SD35_TOKEN its bearer token, when it has
# one. Writes edited.png and edited-img2img.jpg. Needs curl, jq and base64.
set -euo pipefail
url=${SD35_URL:-http://localhost:8080}
image=$1
mask=${2:-}
auth=()
if [ -n "${SD35_TOKEN:-}" ]; then auth=(-H "Authorization: Bearer $SD35_TOKEN"); fi
masked=()
if [ -n "$mask" ]; then masked=(-F "mask=@$mask"); fi

curl -sf "$url/v1/images/edits" "${auth[@]}" \
  -F "image=@$image" "${masked[@]}" \
  -F prompt="a lighthouse in a snow storm, oil painting" \
  -F strength=0.8 -F seed=7 \
  | jq -r '.data[0].b64_json' | base64 -d > edited.png
echo "edited.png"

printf '{"prompt": "the same scene at night", "strength": 0.6, "seed": 7, "image": "%s"}' \
    "$(base64 < "$image" | tr -d '\n')" \
  | curl -sf "$url/v1/img2img" "${auth[@]}" -H 'Content-Type: application/json' \
      -H 'Accept: image/jpeg' --data-binary @- -o edited-img2img.jpg
echo "edited-img2img.jpg"

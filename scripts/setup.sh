#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment in .venv with the pinned requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements.txt

#!/usr/bin/env bash
# mypy --strict over the installed layout: the top-level folders are mapped to
# hostmaint.* through a tree of symlinks, the way setup.py maps them.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=.mypy-src/hostmaint
mkdir -p "$tree"
packages=()
for d in agent coordinator protos lab common osc; do
  ln -sfn "../../$d" "$tree/$d"
  packages+=(-p "hostmaint.$d")
done
MYPYPATH=.mypy-src exec mypy "${packages[@]}" "$@"

#!/bin/sh
# Runs the given targets one after another (one lane; start two lanes for two at a time).
cd "$(dirname "$0")"
for t in "$@"; do ./run.sh "$t" 600 || echo "$t exited with $?" >> logs/lanes.txt; echo "$t done $(date -u +%H:%M:%S)" >> logs/lanes.txt; done

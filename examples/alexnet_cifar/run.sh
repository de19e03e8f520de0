#!/usr/bin/env bash
# The original DeepSpeedExamples command line (training/pipeline_parallelism/run.sh), run from this folder.
deepspeed train.py --deepspeed_config=../../ds_config.json -p 2 --steps=200

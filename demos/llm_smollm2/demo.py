#!/usr/bin/env python
# -*- coding: utf-8 -*-
# The reference's demo.py (LLM low-bit quantization guide); code unchanged.
import os
import sys
import argparse
from dopt.log import Logger
from dopt.dopt_llm.opt_main import parse_args, generate_quant_config, llm_quant_pipline
if __name__ == '__main__':
    args = parse_args()
    ### step1 generate dopt_quant_config
    if not os.path.exists(args.dopt_config):
        generate_quant_config(args.model_path, args.dopt_config)
        Logger.info(f'generate plugin quang config please set quant strategy firstly')
        exit()
    optimize_info = {
        "model_path" :  args.model_path,
        "config_yaml":  args.optimize_config,
        "dopt_config":  args.dopt_config,
        "output_dir" :  args.output_dir,
        "hf_type_save": args.hf_type_save,
        "quant_stage" : args.quant_stage,
        "group_size" :  args.group_size,
        "act_bits":     args.act_bits,
        "w_bits":       args.w_bits,
    }
    ### step2 run llm model Quantification optimization process
    llm_quant_pipline(**optimize_info)

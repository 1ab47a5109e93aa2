"""``econoserve predictor train|eval|predict``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from econoserve.errors import PredictorError
from econoserve.predictor.data import PREDICTOR_DATASETS, VICUNA_LABELS, SplitSpec, default_label, load_labeled_prompts
from econoserve.predictor.evaluation import evaluate
from econoserve.predictor.features import FeatureConfig
from econoserve.predictor.model import OBJECTIVES, REGRESSION_LOSSES, LengthPredictor, PredictorConfig, train_predictor
from econoserve.validation import non_negative_int, output_dir, output_file, positive_float, positive_int, seed
from econoserve.workload.tokenizer import TOKENIZER_NAMES
from econoserve.workload.trace import Trace

_DATASET_HELP = (
    "alpaca-vicuna: Alpaca prompts with the lengths Vicuna-7B generated (train on its 10k train file, "
    "test on its 10k val file); alpaca, sharegpt, qmsum: reference-answer lengths, seeded held-out split "
    "by source record; azure-conv, azure-code, mooncake: token counts only (length-only models, --no-text)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    predictor = subparsers.add_parser(
        "predictor",
        help="train, evaluate and apply the response-length (RL) predictor",
        description=(
            "LightGBM response-length models on prompt features (token/character/word counts, lexical "
            "cues, TF-IDF word n-grams). Objectives: regression (point estimate on log length), quantile "
            "(e.g. the 0.9 quantile, for KV reservation, conformally calibrated) and classification "
            "(length buckets). A model is a directory with model.txt and metadata.json."
        ),
    )
    actions = predictor.add_subparsers(dest="predictor_command", metavar="ACTION", required=True)
    _register_train(actions)
    _register_eval(actions)
    _register_predict(actions)


# --------------------------------------------------------------------- train
def _register_train(actions: argparse._SubParsersAction) -> None:
    train = actions.add_parser(
        "train",
        help="train a model on a dataset's train part and save it",
        description=(
            "Train on the train part of DATASET, evaluate on its test part (metrics go into the "
            "model's metadata.json) and save the model directory. " + _DATASET_HELP + "."
        ),
    )
    train.add_argument("--dataset", required=True, choices=PREDICTOR_DATASETS, metavar="NAME", help=", ".join(PREDICTOR_DATASETS))
    train.add_argument("--objective", default="regression", choices=OBJECTIVES,
                       help="default: regression; rank: a ranker, its scores mapped to lengths by the training "
                            "lengths' quantiles")
    train.add_argument("--quantile", type=positive_float, default=0.9, help="quantile of the quantile objective (default 0.9)")
    train.add_argument("--no-calibration", action="store_true",
                       help="quantile objective: skip the split-conformal calibration on 20%% of the train part")
    train.add_argument("--bucket-width", type=positive_int, default=50, help="classification bucket width [tokens] (default 50)")
    train.add_argument("--regression-loss", default="l2", choices=REGRESSION_LOSSES,
                       help="regression on log length: l2 (default) or l1 (conditional median)")
    train.add_argument("--label", default=None,
                       help=f"label to learn: for alpaca-vicuna one of {', '.join(VICUNA_LABELS)} or temperatures (default "
                            "max: the max over the four temperatures, Zheng et al.'s protocol; temperatures: the four "
                            "single-temperature lengths stacked, for ranking single generations); other datasets: reference")
    train.add_argument("--seed", type=seed, default=0, help="seed of the model and of the train/test split (default 0)")
    train.add_argument("--test-fraction", type=positive_float, default=0.2, help="held-out fraction of source records (default 0.2)")
    train.add_argument("--tokenizer", default="llama2", choices=TOKENIZER_NAMES, help="tokenizer of lengths and features (default llama2)")
    train.add_argument("--no-text", action="store_true", help="length-only model: the prompt token count is the only feature")
    train.add_argument("--no-cues", action="store_true", help="leave out the lexical-cue features")
    train.add_argument("--ngram-vocabulary-size", type=non_negative_int, default=FeatureConfig.ngram_vocabulary_size,
                       help="TF-IDF n-gram vocabulary size, 0 for none (default %(default)s)")
    train.add_argument("--svd-components", type=non_negative_int, default=0, help="reduce the n-grams to this many SVD components (default 0: keep them sparse)")
    train.add_argument("--num-boost-round", type=positive_int, default=None,
                       help="boosting rounds (default 500; 150 for classification, which grows one tree per bucket)")
    train.add_argument("--learning-rate", type=positive_float, default=PredictorConfig.learning_rate, help="default %(default)s")
    train.add_argument("--num-threads", type=positive_int, default=PredictorConfig.num_threads, help="LightGBM threads (default %(default)s)")
    train.add_argument("--prompt-decoupling-folds", type=non_negative_int, default=0, metavar="K",
                       help="regression only: rescale the log prediction by one prompt-length factor fitted on "
                            "out-of-fold predictions over K folds of the training prompts, so that it leans on the "
                            "prompt length no harder than the training truths do (econoserve.predictor.decoupling; "
                            "K extra models; default 0: off)")
    train.add_argument("--max-train", type=positive_int, default=None, metavar="N", help="train on a seeded sample of N prompts")
    train.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation after training")
    train.add_argument("-o", "--output", required=True, type=output_dir, metavar="MODEL_DIR", help="model directory to write")
    train.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    features = FeatureConfig(
        tokenizer=args.tokenizer,
        use_text=not args.no_text,
        lexical_cues=not args.no_cues,
        ngram_vocabulary_size=args.ngram_vocabulary_size,
        svd_components=args.svd_components,
    )
    config = PredictorConfig(
        objective=args.objective,
        regression_loss=args.regression_loss,
        quantile=args.quantile,
        calibrate_quantile=not args.no_calibration,
        bucket_width=args.bucket_width,
        seed=args.seed,
        num_threads=args.num_threads,
        num_boost_round=args.num_boost_round,
        learning_rate=args.learning_rate,
        features=features,
        prompt_decoupling_folds=args.prompt_decoupling_folds,
    )
    split = SplitSpec(test_fraction=args.test_fraction, seed=args.seed)
    tokenizer = args.tokenizer
    print(f"loading {args.dataset} (train part) ...", file=sys.stderr)
    train_data = load_labeled_prompts(args.dataset, "train", tokenizer=tokenizer, split=split)
    if not train_data.has_text and features.use_text:
        raise PredictorError(f"{args.dataset} has no prompt text; pass --no-text for a length-only model")
    train_data = train_data.sample(args.max_train, seed=args.seed)
    label = args.label or default_label(args.dataset)
    predictor = train_predictor(train_data, config, label=label, split=asdict(split), progress=True)
    if not args.no_eval:
        evaluation = evaluate(predictor, args.dataset, latency_samples=0)
        predictor.metrics = evaluation.to_json_dict()
        _print_summary(evaluation)
    predictor.save(args.output)
    print(f"saved {args.output}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------- eval
def _register_eval(actions: argparse._SubParsersAction) -> None:
    evaluation = actions.add_parser(
        "eval",
        help="score a saved model on a dataset's test part, beside a constant-median baseline",
        description=(
            "Predict the test part of DATASET (the train/test split recorded in the model) and write "
            "every metric (MAE, RMSE, R^2, MAE/mean, Acc-50/100, bucket accuracy for widths 50/100/200, "
            "Kendall tau-b, under-prediction rate, over-reservation) for the model and for the "
            "constant-median baseline, for every label of the dataset, plus prediction latency. "
            + _DATASET_HELP + "."
        ),
    )
    evaluation.add_argument("--model", required=True, type=Path, metavar="MODEL_DIR")
    evaluation.add_argument("--dataset", required=True, choices=PREDICTOR_DATASETS, metavar="NAME", help=", ".join(PREDICTOR_DATASETS))
    evaluation.add_argument("--json", required=True, type=output_file, metavar="METRICS.json", help="metrics file to write")
    evaluation.add_argument("--predictions", type=output_file, default=None, metavar="OUT.parquet",
                            help="also write the per-request predictions (for the figures)")
    evaluation.add_argument("--sample", type=positive_int, default=None, metavar="N", help="score a seeded sample of N test prompts")
    evaluation.add_argument("--latency-samples", type=non_negative_int, default=200, metavar="N",
                            help="single requests timed for the latency percentiles, 0 to skip (default 200)")
    evaluation.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> int:
    predictor = LengthPredictor.load(args.model)
    result = evaluate(predictor, args.dataset, sample_size=args.sample, latency_samples=args.latency_samples)
    result.write_json(args.json)
    if args.predictions is not None:
        args.predictions.parent.mkdir(parents=True, exist_ok=True)
        result.predictions.to_parquet(args.predictions, index=False)
    _print_summary(result)
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _print_summary(result) -> None:
    model = result.metrics[result.primary_label]["model"]
    baseline = result.metrics[result.primary_label]["baseline"]
    print(f"{result.dataset} test, label {result.primary_label}, {model.num_requests} requests", file=sys.stderr)
    for name, attribute in (("MAE [tokens]", "mae_tokens"), ("Acc-100", "acc_100"), ("Kendall tau-b", "kendall_tau_b"),
                            ("under-prediction", "under_prediction_rate"), ("over-reservation / mean", "over_reservation_ratio")):
        print(f"  {name:24} model {getattr(model, attribute):8.3f}   baseline {getattr(baseline, attribute):8.3f}", file=sys.stderr)
    for warning in result.warnings:
        print(f"  warning: {warning}", file=sys.stderr)


# --------------------------------------------------------------------- predict
def _register_predict(actions: argparse._SubParsersAction) -> None:
    predict = actions.add_parser(
        "predict",
        help="fill a trace's predicted_output_tokens",
        description=(
            "Read a trace, predict each request's response length [tokens] with a saved model and write "
            "the trace with predicted_output_tokens. Text models need the trace's prompt_text column."
        ),
    )
    predict.add_argument("--model", required=True, type=Path, metavar="MODEL_DIR")
    predict.add_argument("--trace", required=True, type=Path, metavar="IN.parquet")
    predict.add_argument("-o", "--output", required=True, type=output_file, metavar="OUT.parquet")
    predict.add_argument("--allow-tokenizer-mismatch", action="store_true",
                         help="predict even if the trace was tokenized with another tokenizer than the model's")
    predict.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    predictor = LengthPredictor.load(args.model)
    trace = Trace.read(args.trace)
    annotated = predictor.predict_trace(trace, check_tokenizer=not args.allow_tokenizer_mismatch)
    annotated = replace(annotated, metadata=dict(annotated.metadata) | {
        "predictor": {"model": str(args.model), "objective": predictor.config.objective,
                      "label": predictor.label, "training_table_sha256": predictor.training_data.get("table_sha256")}
    })
    annotated.write(args.output)
    predicted = annotated.requests["predicted_output_tokens"]
    print(json.dumps({"requests": len(annotated), "mean_predicted_output_tokens": float(predicted.mean())}), file=sys.stderr)
    return 0

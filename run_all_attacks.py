"""Run the three privacy attacks on a trained global model, in sequence.

    python run_all_attacks.py [--model global_model.pth] [--attacks gradient,model,gan] [flags]

Writes to --output-dir (default attack_results/): gradient_inversion_idlg.png,
gradient_inversion_rounds.png, leakage_map.png, model_inversion_all.png, gan_inversion_all.png,
gan_samples.png, metrics.json,
metrics.schema.json, reconstructions.npz and report.html. The folder is replaced whole at the end,
so a crash never leaves old and new results mixed; only a new or empty folder, or one an earlier
run of this script wrote, is ever replaced (anything else is refused before the work starts).
Each attack's own flags are listed under its heading.
"""
import argparse
import sys

from src.attacks import runner

TOOL = 'run_all_attacks'  # the owner recorded in the results folder's marker


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='global_model.pth', help='global model written by main.py')
    p.add_argument('--history', help='training_history.json (default: beside --model)')
    p.add_argument('--data-dir', help="the clients' data (default: the directory training used)")
    runner.add_arguments(p)
    return runner.parse_args(p, argv)


def main(argv=None):
    args = parse_args(argv)
    from src.attacks.target import load_attack_inputs
    from src.utils import UserError, atomic_dir, check_output_dir

    try:
        runner.check_args(args)
        check_output_dir(args.output_dir, TOOL, replace=True)  # before any work: never a user's folder
        view, private = load_attack_inputs(args.model, args.history, args.data_dir, args.device, args.cache_dir)
        with atomic_dir(args.output_dir, TOOL) as staging:
            runner.write_results(view, private, args, staging, args.model)
        print(f'wrote figures, metrics.json, reconstructions.npz and report.html to {args.output_dir}')
    except UserError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()

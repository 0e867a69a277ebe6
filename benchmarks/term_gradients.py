"""Size of each loss term's gradient on the network's weights, for a few training steps of a trainer on a planned
dataset: which term drives the update. Prints one JSON line per step: each term's value and gradient norm (weight
included), the norm of the summed gradient (nnU-Net clips it at 12) and the cosine between the supervised gradient
and the sum of the others. A real optimizer step follows each measured one.

    python benchmarks/term_gradients.py -d Dataset027_ACDC -p nnUNetPlans_cpu \\
        -tr nnUNetTrainerARCO_SAG:lambda_equivariance=0 --phase finetune --init MODEL_FOLDER/fold_0/checkpoint_final.pth

``--init`` starts student and teacher from a checkpoint (e.g. a plain nnU-Net model, standing in for the state a
run reaches), so fine-tuning terms are measured with a teacher that segments; otherwise the weights are random.
``--values-only`` skips the per-term gradients (one backward per step instead of one per term) and prints every
``--every``-th step's term values: how the terms move over a few hundred steps, e.g. whether a representation
collapses (MONA / ARCO's pixel contrast then sits at ``log(1 + negatives)``, 6.2403 for 512)::

    python benchmarks/term_gradients.py -d 27 -p nnUNetPlans_cpu -tr nnUNetTrainerARCO_SAG --phase finetune \
        --init PLAIN_MODEL/fold_0/checkpoint_final.pth --steps 200 --values-only --every 20
"""
import argparse
import json
import os


def main(argv=None) -> None:
    from bench_trainers import add_dataset_arguments, build_trainer
    from nnunet_semiseg.training.base import stop_loaders
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(ap)
    ap.add_argument('-tr', required=True, help='NAME[:attr=value,...] as in bench_trainers.py')
    ap.add_argument('--phase', choices=('pretrain', 'finetune'), default='finetune')
    ap.add_argument('--init', help='checkpoint whose network weights start student and teacher')
    ap.add_argument('--steps', type=int, default=3)
    ap.add_argument('--values-only', action='store_true', help='term values only, no per-term gradients')
    ap.add_argument('--every', type=int, default=1, help='print every N-th step')
    args = ap.parse_args(argv)
    import torch

    torch.manual_seed(0)
    _, t = build_trainer(args.tr, args.d, args.c, args.p, torch.device('cpu'), epochs=4, iterations=250)
    t.on_train_start()
    if args.init:
        t.network.load_state_dict(torch.load(args.init, map_location='cpu', weights_only=False)['network_weights'])
        if hasattr(t, 'teacher'):
            t.teacher.copy_from(t._student_bundle)
    if hasattr(t, 'pretrain_iterations'):
        t.semiseg_step = t.pretrain_iterations if args.phase == 'finetune' else 0
    params = [p for p in t.network.parameters() if p.requires_grad]
    for step in range(args.steps):
        batch = next(t.dataloader_train)
        data, target = batch['data'], batch['target']
        u = next(t.dataloader_unlabeled) if getattr(t, 'dataloader_unlabeled', None) is not None else None
        weak, strong = (None, None) if u is None else (u['data_weak'], u['data_strong'])
        supervised, method_terms = t.step_losses(data, target, weak, strong)
        if getattr(t, 'wants_second_pass', lambda: False)():   # terms run in their own forward (separate graph)
            t._features.clear()
            method_terms.update(t.second_pass_terms())
        terms = {'supervised': (1.0, supervised), **method_terms}
        grads, record = [], {'step': step, 'values': {}, 'grad_norms': {}}
        if args.values_only:
            record = {'step': step, 'values': {name: round(float(v.detach()), 5) for name, (_, v) in terms.items()}}
        for name, (w, v) in ([] if args.values_only else terms.items()):
            g = torch.autograd.grad(w * v, params, retain_graph=True, allow_unused=True)
            grads.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten()
                                    for gi, p in zip(g, params)]))
            record['values'][name] = round(float(v.detach()), 5)
            record['grad_norms'][name] = round(float(grads[-1].norm()), 5)
        if grads:
            total = torch.stack(grads).sum(0)
            record['total_grad_norm'] = round(float(total.norm()), 5)
            record['cos_supervised_rest'] = round(float(torch.nn.functional.cosine_similarity(
                grads[0], total - grads[0], dim=0)), 4) if len(grads) > 1 else None
        if step % args.every == 0 or step == args.steps - 1:
            print(json.dumps(record), flush=True)
        t.optimizer.zero_grad(set_to_none=True)
        sum(w * v for w, v in terms.values()).backward()
        torch.nn.utils.clip_grad_norm_(params, 12)
        t.optimizer.step()
        if hasattr(t, 'teacher'):
            t.teacher.update(t._student_bundle)
            t.semiseg_step += 1
    stop_loaders(t)
    os._exit(0)   # nnU-Net's loader threads would otherwise keep the process alive


if __name__ == '__main__':
    main()

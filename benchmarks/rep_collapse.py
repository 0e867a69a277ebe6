"""Has a trained contrastive model's representation collapsed? Reads a checkpoint of a MONA / ARCO / ACTION(++) run,
runs student and teacher on a few labelled and unlabelled training batches, and prints, for the L2-normalised
representation vectors at 4,096 random positions (``rep_head``, the student's through its predictor where the method
has one):

* the mean and the 1st percentile of the cosine between two random positions (1.0 and 1.0: every position has the
  same vector, and a pixel contrast with it sits at ``log(1 + negatives)`` whatever its sampler draws);
* the share of the vectors' second moment in its largest direction (1.0: rank one);
* the mean cosine between positions of the same class and of different classes (by label / teacher pseudo-label):
  a representation that separates classes has the second well below the first.

    python benchmarks/rep_collapse.py -d 27 -p nnUNetPlans_cpu -tr nnUNetTrainerARCO_SAG \\
        --checkpoint OUT/nnUNetTrainerARCO_SAG__seed1/Dataset027_ACDC/*/fold_0/checkpoint_final.pth
"""
import argparse
import json
import os


def stats(vectors, labels, generator):
    """``vectors [P, D]`` (normalised), ``labels [P]``: the figures of the module docstring, as a dict."""
    import torch
    n = vectors.shape[0]
    i = torch.randint(n, (20000,), generator=generator)
    j = torch.randint(n, (20000,), generator=generator)
    cos = (vectors[i] * vectors[j]).sum(1)
    same = labels[i] == labels[j]
    second_moment = torch.linalg.svdvals(vectors) ** 2
    return {'mean_cos': round(float(cos.mean()), 4), 'p01_cos': round(float(cos.quantile(0.01)), 4),
            'top_direction_share': round(float(second_moment[0] / second_moment.sum()), 4),
            'same_class_cos': round(float(cos[same].mean()), 4),
            'other_class_cos': round(float(cos[~same].mean()), 4) if (~same).any() else None}


def main(argv=None) -> None:
    from bench_trainers import add_dataset_arguments, build_trainer
    from nnunet_semiseg.training.base import stop_loaders
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(ap)
    ap.add_argument('-tr', required=True, help='the trainer the checkpoint was trained with')
    ap.add_argument('--checkpoint', required=True)
    ap.add_argument('--batches', type=int, default=3)
    ap.add_argument('--positions', type=int, default=4096)
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from nnunet_semiseg.contrast.pixel_contrast import resize_nearest
    torch.manual_seed(0)
    _, t = build_trainer(args.tr, args.d, args.c, args.p, torch.device('cpu'), epochs=4, iterations=250)
    t.on_train_start()
    t.load_checkpoint(args.checkpoint)
    t.network.eval()
    t.semiseg_modules.eval()
    predictor = next((k for k in ('rep_predictor', 'anco_predictor', 'predictor') if k in t.semiseg_modules), None)
    reps = {'student': [], 'teacher': []}
    labels = []
    with torch.no_grad():
        for _ in range(args.batches):
            batch, unlabeled = next(t.dataloader_train), next(t.dataloader_unlabeled)
            x = torch.cat((batch['data'], unlabeled['data_weak']))
            t._features.clear()
            t_logits, t_feats = t.teacher_forward(x)
            teacher = t.teacher.module['rep_head']([t_feats[i] for i in t.tapped_decoder_stages])
            t.network(x)
            feats = t.student_features()
            student = t.semiseg_modules['rep_head']([feats[i] for i in t.tapped_decoder_stages],
                                                    None if predictor is None else t.semiseg_modules[predictor])
            target = batch['target'][0] if isinstance(batch['target'], list) else batch['target']
            lab = torch.cat((target[:, 0].long(), t_logits.argmax(1)[target.shape[0]:]))
            lab = resize_nearest(lab, teacher.shape[2:])
            for key, rep in (('student', student), ('teacher', teacher)):
                reps[key].append(F.normalize(rep.float().movedim(1, -1).reshape(-1, rep.shape[1]), dim=1))
            labels.append(lab.reshape(-1))
    g = torch.Generator().manual_seed(0)
    labels = torch.cat(labels)
    pick = torch.randperm(labels.shape[0], generator=g)[:args.positions]
    out = {'checkpoint': args.checkpoint, 'predictor': predictor}
    for key in reps:
        out[key] = stats(torch.cat(reps[key])[pick], labels[pick], g)
    print(json.dumps(out, indent=1), flush=True)
    stop_loaders(t)
    os._exit(0)   # nnU-Net's loader threads would otherwise keep the process alive


if __name__ == '__main__':
    main()

// Runs faceres-deep in TensorFlow.js (CPU backend) on raw 0-255 RGB inputs and prints its outputs
// as JSON, for tests/test_face_nets.py to compare with model_defs.face_nets numerically.
//   node tools/faceres_tfjs_reference.mjs MODEL_JSON INPUT_BIN SIZE COUNT
// INPUT_BIN: COUNT x SIZE x SIZE x 3 float32 (NHWC, 0-255). Needs `npm install @tensorflow/tfjs`.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

const require = createRequire(path.join(process.cwd(), 'package.json'));
const tf = require('@tensorflow/tfjs');

const [modelJson, inputBin, size, count] = process.argv.slice(2);
const n = Number(count), s = Number(size);
const spec = JSON.parse(fs.readFileSync(modelJson, 'utf8'));
const dir = path.dirname(modelJson);
// the graph declares a 224x224 input; its ops take any size, so let the placeholder take SIZE too
for (const node of spec.modelTopology.node.filter((nd) => nd.op === 'Placeholder')) {
  node.attr.shape.shape.dim = [{ size: '-1' }, { size: String(s) }, { size: String(s) }, { size: '3' }];
}
const specs = spec.weightsManifest.flatMap((g) => g.weights);
const bufs = spec.weightsManifest.flatMap((g) => g.paths.map((p) => fs.readFileSync(path.join(dir, p))));
const all = Buffer.concat(bufs);
const weightData = all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength);
await tf.setBackend('cpu');
const model = await tf.loadGraphModel(tf.io.fromMemory({ modelTopology: spec.modelTopology, weightSpecs: specs, weightData }));
const raw = fs.readFileSync(inputBin);
const x = tf.tensor4d(new Float32Array(raw.buffer, raw.byteOffset, n * s * s * 3), [n, s, s, 3]);
const outs = model.execute(x, ['global_pooling/Mean', 'age_pred/Softmax', 'gender_pred/Sigmoid']);
const [feat, age, gender] = await Promise.all(outs.map((t) => t.array()));
process.stdout.write(JSON.stringify({ feat, age, gender }));

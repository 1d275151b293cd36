// Parses PowerShell scripts with the tree-sitter PowerShell grammar and fails on any syntax
// error (PowerShell itself cannot be installed here).
import Parser from 'tree-sitter';
import PowerShell from 'tree-sitter-powershell';
import { readFileSync } from 'node:fs';

const parser = new Parser();
parser.setLanguage(PowerShell);

function firstError(node) {
  if (node.type === 'ERROR' || node.isMissing) return node;
  for (const child of node.children) {
    if (child.hasError || child.isMissing) {
      const found = firstError(child);
      if (found) return found;
    }
  }
  return null;
}

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error('usage: node scripts/check-powershell.mjs FILE.ps1...');
  process.exit(2);
}
// Self-check: a broken script must be caught, or the check proves nothing.
if (!parser.parse('function f( { $x = \n').rootNode.hasError) {
  console.error('the PowerShell grammar accepted broken input');
  process.exit(2);
}
let failed = 0;
for (const file of files) {
  const tree = parser.parse(readFileSync(file, 'utf8'));
  const error = tree.rootNode.hasError ? firstError(tree.rootNode) : null;
  if (tree.rootNode.hasError) {
    failed++;
    const at = error ? `line ${error.startPosition.row + 1}, column ${error.startPosition.column + 1}` : 'unknown position';
    console.error(`FAIL ${file}: syntax error at ${at}`);
  } else {
    console.log(`ok   ${file}`);
  }
}
console.log(`powershell grammar: ${files.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);

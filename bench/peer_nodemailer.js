// A peer client for `make bench`: Nodemailer's pooled SMTP transport sending
// N messages over CONNS connections (maxMessages PER_CONN per connection,
// 0: no cap), all handed to it at once as an application would.
//   node peer_nodemailer.js PORT N SIZE CONNS PER_CONN   (NODE_PATH: where nodemailer is)
const nodemailer = require("nodemailer");
const [port, n, size, conns, per] = process.argv.slice(2).map(Number);
const body = ("x".repeat(70) + "\r\n").repeat(Math.floor(size / 72));
const t = nodemailer.createTransport({
  host: "127.0.0.1", port, secure: false, ignoreTLS: true, pool: true,
  maxConnections: conns, maxMessages: per > 0 ? per : Infinity,
});
const start = process.hrtime.bigint();
let done = 0, failed = 0;
for (let i = 0; i < n; i++) {
  t.sendMail({ envelope: { from: "a@x.test", to: ["b@y.test"] },
               raw: `From: a@x.test\r\nTo: b@y.test\r\nSubject: ${i}\r\n\r\n${body}` }, (err) => {
    if (err) failed++;
    if (++done === n) {
      const secs = Number(process.hrtime.bigint() - start) / 1e9;
      t.close();
      if (failed) { console.log(`failed ${failed}`); process.exit(1); }
      console.log(secs.toFixed(4));
    }
  });
}

import Foundation

/// Draws the training loss (and validation points) as a self-contained SVG: no plotting
/// library, readable in any browser.
public enum LossCurve {
    public static func svg(
        train: [(step: Int, loss: Double)], validation: [(step: Int, loss: Double)],
        reference: [(label: String, loss: Double)] = [], title: String
    ) -> String {
        let w = 720.0, h = 420.0, left = 64.0, right = 170.0, top = 40.0, bottom = 48.0
        let pw = w - left - right, ph = h - top - bottom
        let all = train.map(\.loss) + validation.map(\.loss) + reference.map(\.loss)
        let finite = all.filter(\.isFinite)
        var lo = finite.min() ?? 0, hi = finite.max() ?? 1
        if hi - lo < 1e-9 { hi += 0.5; lo -= 0.5 }
        let pad = (hi - lo) * 0.05
        lo -= pad; hi += pad
        let maxStep = Double(max(1, (train.map(\.step) + validation.map(\.step)).max() ?? 1))
        func x(_ s: Int) -> Double { left + Double(s) / maxStep * pw }
        func y(_ v: Double) -> Double { top + (hi - v) / (hi - lo) * ph }
        func f(_ v: Double) -> String { String(format: "%.1f", v) }
        func esc(_ s: String) -> String {
            s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(
                of: ">", with: "&gt;")
        }
        var s =
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(w))\" height=\"\(Int(h))\" "
            + "viewBox=\"0 0 \(Int(w)) \(Int(h))\" font-family=\"sans-serif\" font-size=\"12\">\n"
        s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        s += "<text x=\"\(f(left))\" y=\"24\" font-size=\"15\" font-weight=\"bold\">\(esc(title))</text>\n"
        // Grid and ticks.
        for i in 0...5 {
            let v = lo + (hi - lo) * Double(i) / 5, yy = y(v)
            s += "<line x1=\"\(f(left))\" y1=\"\(f(yy))\" x2=\"\(f(left + pw))\" y2=\"\(f(yy))\" stroke=\"#e5e5e5\"/>\n"
            s += "<text x=\"\(f(left - 6))\" y=\"\(f(yy + 4))\" text-anchor=\"end\">\(String(format: "%.3f", v))</text>\n"
        }
        for i in 0...5 {
            let st = Int((maxStep * Double(i) / 5).rounded()), xx = x(st)
            s += "<line x1=\"\(f(xx))\" y1=\"\(f(top + ph))\" x2=\"\(f(xx))\" y2=\"\(f(top + ph + 4))\" stroke=\"#333\"/>\n"
            s += "<text x=\"\(f(xx))\" y=\"\(f(top + ph + 18))\" text-anchor=\"middle\">\(st)</text>\n"
        }
        s += "<rect x=\"\(f(left))\" y=\"\(f(top))\" width=\"\(f(pw))\" height=\"\(f(ph))\" fill=\"none\" stroke=\"#333\"/>\n"
        s += "<text x=\"\(f(left + pw / 2))\" y=\"\(f(h - 8))\" text-anchor=\"middle\">optimizer step</text>\n"
        s +=
            "<text x=\"16\" y=\"\(f(top + ph / 2))\" text-anchor=\"middle\" transform=\"rotate(-90 16 "
            + "\(f(top + ph / 2)))\">loss (nats/token)</text>\n"
        let colors = ["#888888", "#d62728", "#2ca02c", "#9467bd"]
        for (i, r) in reference.enumerated() where r.loss.isFinite {
            let yy = y(r.loss), c = colors[i % colors.count]
            s +=
                "<line x1=\"\(f(left))\" y1=\"\(f(yy))\" x2=\"\(f(left + pw))\" y2=\"\(f(yy))\" "
                + "stroke=\"\(c)\" stroke-dasharray=\"6 4\"/>\n"
        }
        let pts = train.filter { $0.loss.isFinite }.map { "\(f(x($0.step))),\(f(y($0.loss)))" }.joined(separator: " ")
        if !pts.isEmpty { s += "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"\(pts)\"/>\n" }
        for v in validation where v.loss.isFinite {
            s += "<circle cx=\"\(f(x(v.step)))\" cy=\"\(f(y(v.loss)))\" r=\"4\" fill=\"#ff7f0e\"/>\n"
        }
        // Legend.
        var ly = top + 10
        let lx = left + pw + 14
        s +=
            "<line x1=\"\(f(lx))\" y1=\"\(f(ly))\" x2=\"\(f(lx + 22))\" y2=\"\(f(ly))\" "
            + "stroke=\"#1f77b4\" stroke-width=\"2\"/><text x=\"\(f(lx + 28))\" y=\"\(f(ly + 4))\">train "
            + "loss</text>\n"
        ly += 20
        s +=
            "<circle cx=\"\(f(lx + 11))\" cy=\"\(f(ly))\" r=\"4\" fill=\"#ff7f0e\"/><text "
            + "x=\"\(f(lx + 28))\" y=\"\(f(ly + 4))\">validation</text>\n"
        for (i, r) in reference.enumerated() where r.loss.isFinite {
            ly += 20
            s +=
                "<line x1=\"\(f(lx))\" y1=\"\(f(ly))\" x2=\"\(f(lx + 22))\" y2=\"\(f(ly))\" "
                + "stroke=\"\(colors[i % colors.count])\" stroke-dasharray=\"6 4\"/><text "
                + "x=\"\(f(lx + 28))\" y=\"\(f(ly + 4))\">\(esc(r.label)) "
                + "\(String(format: "%.4f", r.loss))</text>\n"
        }
        s += "</svg>\n"
        return s
    }
}

import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;

/**
 * The benchmarks' latency client (crates/agent/bench-heap): sequential GETs on loopback, one
 * connection each (Connection: close), timed with System.nanoTime.
 *
 * <p>{@code java Latency PORT PATH N [SKIP]}: first warms its own code on an in-process server
 * (so the client's JIT is not what is measured) and prints "ready"; then polls PATH every 2 ms
 * (up to 120 s) until it answers 200, sends SKIP requests untimed (a warm-up), then N timed
 * ones, and prints one line: {@code n=N p50_ms=… p90_ms=… max_ms=… mean_ms=… first_ms=…}
 * (first_ms: the first timed request). Exits 1 if any timed request does not answer 200.
 */
public final class Latency {
    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        String path = args[1];
        int n = Integer.parseInt(args[2]);
        int skip = args.length > 3 ? Integer.parseInt(args[3]) : 0;
        warmSelf(path);
        System.out.println("ready");
        System.out.flush();
        long deadline = System.nanoTime() + 120_000_000_000L;
        while (status(port, path) != 200) {
            if (System.nanoTime() > deadline) {
                System.out.println("error: no 200 on port " + port + " within 120 s");
                System.exit(1);
            }
            Thread.sleep(2);
        }
        for (int i = 0; i < skip; i++) {
            status(port, path);
        }
        long[] ns = new long[n];
        for (int i = 0; i < n; i++) {
            long t0 = System.nanoTime();
            int s = status(port, path);
            ns[i] = System.nanoTime() - t0;
            if (s != 200) {
                System.out.println("error: request " + i + " answered " + s);
                System.exit(1);
            }
        }
        long first = ns[0];
        long sum = 0;
        for (long x : ns) {
            sum += x;
        }
        Arrays.sort(ns);
        System.out.printf("n=%d p50_ms=%.2f p90_ms=%.2f max_ms=%.2f mean_ms=%.2f first_ms=%.2f%n",
                n, ms(ns[(n - 1) / 2]), ms(ns[(int) Math.ceil(n * 0.9) - 1]), ms(ns[n - 1]),
                ms(sum / n), ms(first));
    }

    private static double ms(long ns) {
        return ns / 1e6;
    }

    /** One GET; the status code, or -1 when the connection fails. */
    private static int status(int port, String path) {
        try (Socket s = new Socket(InetAddress.getLoopbackAddress(), port)) {
            s.setSoTimeout(10_000);
            OutputStream out = s.getOutputStream();
            out.write(("GET " + path + " HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                    .getBytes(StandardCharsets.US_ASCII));
            out.flush();
            InputStream in = s.getInputStream();
            byte[] buf = new byte[4096];
            int len = 0;
            for (int r; (r = in.read(buf, len, buf.length - len)) > 0 && len < buf.length; ) {
                len += r;
            }
            String head = new String(buf, 0, Math.min(len, 16), StandardCharsets.US_ASCII);
            String[] parts = head.split(" ");
            return parts.length > 1 ? Integer.parseInt(parts[1]) : -1;
        } catch (IOException | NumberFormatException e) {
            return -1;
        }
    }

    /** 300 requests against a trivial server of our own, so this client's code is compiled. */
    private static void warmSelf(String path) throws IOException {
        try (ServerSocket server = new ServerSocket(0, 64, InetAddress.getLoopbackAddress())) {
            Thread t = new Thread(() -> {
                byte[] reply = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
                        .getBytes(StandardCharsets.US_ASCII);
                while (!server.isClosed()) {
                    try (Socket c = server.accept()) {
                        byte[] buf = new byte[1024];
                        c.getInputStream().read(buf);
                        c.getOutputStream().write(reply);
                    } catch (IOException e) {
                        return;
                    }
                }
            });
            t.setDaemon(true);
            t.start();
            for (int i = 0; i < 300; i++) {
                status(server.getLocalPort(), path);
            }
        }
    }
}

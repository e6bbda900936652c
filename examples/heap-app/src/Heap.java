import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.IOException;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.atomic.AtomicLong;

/**
 * An HTTP app with a configurable amount of live heap, for the heap-size curve of crac-agent's
 * benchmarks (crates/agent/bench-heap). No dependencies: com.sun.net.httpserver only.
 *
 * <p>At start it allocates $HEAP_MIB MiB (default 256) of long-lived data in 256 KiB arrays
 * (small enough that G1 never treats one as humongous) and fills every long with a value
 * derived from its position, so no page is zero or alike and all of it is dumped. Filling it
 * is part of the cold start, as loading its data is for a real app.
 *
 * <p>GET / answers "heap N MiB, request K, sum S": K counts the requests since the JVM
 * started (a restored JVM that answers K = 201 after a warm-up of 200 kept its heap); each
 * request reads 64 longs at pseudo-random places all over the data (64 pages touched, as a
 * request that looks up data would). GET /verify checks the first and last long of every
 * array against what was written ("ok" or 500). GET /ready answers "ok".
 *
 * <p>The port is the first argument, else $HEAP_PORT, else 8080; the bind address is
 * 127.0.0.1.
 */
public final class Heap {
    private static final int LONGS_PER_ARRAY = 32 * 1024; // 256 KiB
    private static final int ARRAYS_PER_MIB = 4;
    private static final int TOUCHES_PER_REQUEST = 64;

    private static final AtomicLong COUNTER = new AtomicLong();
    private static long[][] data;

    public static void main(String[] args) throws IOException {
        int port = Integer.parseInt(args.length > 0 ? args[0] : env("HEAP_PORT", "8080"));
        int mib = Integer.parseInt(env("HEAP_MIB", "256"));
        data = new long[mib * ARRAYS_PER_MIB][];
        for (int i = 0; i < data.length; i++) {
            long[] a = new long[LONGS_PER_ARRAY];
            for (int j = 0; j < a.length; j++) {
                a[j] = value(i, j);
            }
            data[i] = a;
        }
        HttpServer server = HttpServer.create(new InetSocketAddress(InetAddress.getLoopbackAddress(), port), 64);
        server.createContext("/", exchange -> {
            if (!exchange.getRequestURI().getPath().equals("/")) {
                reply(exchange, 404, "not found\n");
                return;
            }
            long k = COUNTER.incrementAndGet();
            long sum = 0;
            long x = k * 0x9E3779B97F4A7C15L;
            for (int t = 0; t < TOUCHES_PER_REQUEST; t++) {
                x = mix(x + t);
                int i = (int) Long.remainderUnsigned(x, data.length);
                int j = (int) Long.remainderUnsigned(x >>> 17, LONGS_PER_ARRAY);
                sum += data[i][j];
            }
            reply(exchange, 200, "heap " + mib + " MiB, request " + k + ", sum " + sum + "\n");
        });
        server.createContext("/verify", exchange -> {
            for (int i = 0; i < data.length; i++) {
                long[] a = data[i];
                if (a[0] != value(i, 0) || a[a.length - 1] != value(i, a.length - 1)) {
                    reply(exchange, 500, "array " + i + " differs\n");
                    return;
                }
            }
            reply(exchange, 200, "ok\n");
        });
        server.createContext("/ready", exchange -> reply(exchange, 200, "ok\n"));
        server.start();
        System.out.println("heap-app: " + mib + " MiB live, listening on 127.0.0.1:" + port);
    }

    private static long value(int i, int j) {
        return mix(((long) i << 32) ^ j);
    }

    /** SplitMix64's finalizer: a cheap, well-spread function of its input. */
    private static long mix(long z) {
        z = (z ^ (z >>> 30)) * 0xBF58476D1CE4E5B9L;
        z = (z ^ (z >>> 27)) * 0x94D049BB133111EBL;
        return z ^ (z >>> 31);
    }

    private static String env(String name, String fallback) {
        String value = System.getenv(name);
        return value == null || value.isEmpty() ? fallback : value;
    }

    private static void reply(HttpExchange exchange, int status, String body) throws IOException {
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        exchange.getResponseHeaders().set("Content-Type", "text/plain; charset=utf-8");
        exchange.sendResponseHeaders(status, bytes.length);
        try (OutputStream out = exchange.getResponseBody()) {
            out.write(bytes);
        }
    }
}
